"""The core that `curate` and `distill` share, and that imports neither of them.

What both stages must agree on byte for byte lives here, once:

    view.py      InputSpec and the one decode of bytes or arrays into the network's view
    tensors.py   normalisation and device choice (torch)
    specs.py     `?key=value` options, `topk:K`
    storage.py   local paths and URLs (fsspec), atomic writes, streamed reads
    options.py   config dataclass fields -> CLI options and pipeline TOML keys
    errors.py    UserError: one line on stderr, exit code 2
    progress.py  progress bars on stderr
"""
