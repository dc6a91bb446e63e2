"""Integrations with other libraries. Each module imports its library on use; none is
imported by `import fastattn`.

    fastattn.integrations.transformers.register()   # attn_implementation="fastattn"
"""
