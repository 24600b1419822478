"""The Python API: `zipmoe.open` (tensors), `zipmoe.load` (generation), `zipmoe.to_transformers` (a transformers model).

Each lives in a module of its own so that using one never imports what another needs: `open` works without torch,
`load` needs the runtime's torch, `to_transformers` needs transformers. `zipmoe` re-exports them lazily; docs/API.md
describes them with examples.
"""
