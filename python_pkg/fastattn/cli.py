"""The `fastattn` command.

    fastattn info [--check]        version, build, backends and why any is unavailable;
                                   --check runs each CPU backend against the reference
    fastattn bench ...             benchmark sweeps (fastattn.bench)
    fastattn train / generate ...  reference transformer (fastattn.models)

Subcommands other than `info` live in their own modules, each exposing
add_subparser(subparsers) and run(args); they are imported only when present.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

_SUBCOMMAND_MODULES = ("fastattn.bench", "fastattn.models.train", "fastattn.models.generate")


def _info(args) -> int:
    import torch

    import fastattn
    from fastattn import dispatch

    print(f"fastattn {fastattn.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, machine {platform.machine()}")
    ci = fastattn.cpu_info()
    print(f"cpu: {ci['cpu']}")
    print(f"cpu extension: {ci['build']}")
    from fastattn._extension import BUILD_INFO_FILE, build_record

    rec = build_record()
    if rec is None:
        print(f"build record: none ({BUILD_INFO_FILE} is written by setup.py when it builds)")
    elif "torch" in rec:
        print(f"build record: fastattn {rec.get('fastattn')} built {rec.get('built')} against "
              f"torch {rec['torch']} (C++11 ABI {int(bool(rec.get('cxx11_abi')))}), "
              f"{rec.get('compiler')}, extensions {', '.join(rec.get('extensions', []))}")
    else:
        print(f"build record: {rec.get('error')}")
    if ci["variant"] is not None:
        print(f"cpu kernels: running the {ci['variant']} variant ({ci['features']}; "
              f"FASTATTN_CPU_ISA=generic|avx2|avx512 forces a lower one)")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"CUDA available: {torch.cuda.is_available()}")
    print("backends:")
    for name, (ok, why) in fastattn.available_backends().items():
        b = dispatch.get(name)
        caps = ""
        if b is not None:
            dts = ",".join(str(d).replace("torch.", "") for d in b.dtypes)
            hd = f"head dim <= {b.max_head_dim}" if b.max_head_dim < 1 << 20 else "any head dim"
            if getattr(b, "max_head_dim_grad", None):  # cuda: the backward stops lower
                hd += f" (<= {b.max_head_dim_grad} with deterministic gradients)"
            caps = (f" [{'/'.join(b.devices)}; {dts}; {hd}; "
                    f"window={'y' if b.supports_window else 'n'} "
                    f"block_mask={'y' if b.supports_block_mask else 'n'} "
                    f"backward={'y' if b.supports_backward else 'n'} "
                    f"lse={'y' if b.supports_lse else 'n'}]")
        print(f"  {name:10s} {'available' if ok else 'unavailable'}: {why}{caps}")
    from fastattn import gpu_validation

    for line in gpu_validation.describe():
        print(line)
    if getattr(args, "check", False):
        from fastattn import selfcheck

        results = selfcheck.run()
        print("check (float32 causal GQA forward + backward against float64 naive attention):")
        for name, passed, detail in results:
            print(f"  {name:10s} {'PASS' if passed else 'FAIL'}: {detail}")
        if not results:
            print("  no CPU backend is available to check")
        return 0 if results and all(p for _, p, _ in results) else 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastattn", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="version, build and available backends")
    p.add_argument("--check", action="store_true",
                   help="also run a small forward + backward on each available CPU backend "
                        "against float64 naive attention (exit 1 on a failure)")
    p.set_defaults(_run=_info)
    for mod_name in _SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and mod_name.startswith(e.name):  # the module itself is absent
                continue
            raise
        before = set(sub.choices)
        mod.add_subparser(sub)
        for name in set(sub.choices) - before:
            sub.choices[name].set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rc = args._run(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
