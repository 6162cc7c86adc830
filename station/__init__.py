"""The operator station: a web page for the line, beside `edge/`.

It reads the defect log through `edge.defect_log`'s reader (and acts through it, in the same
short transactions the CLI uses) and the line's state through the metrics and live frames
the line publishes (`edge.metrics`); it never touches the worker. The line never imports it.

Read in this order:
  link.py      the line's published state -> LineState (over HTTP, or in-process)
  app.py       the Starlette app: pages, actions, images, safety
  report.py    the shift report and the what-if threshold
  roi.py       saving a drawn ROI into the config file
  server.py    uvicorn, in the foreground (`grad-edge serve`) or beside a line (`run --serve`)
  dataset.py   `grad-edge dataset`: judged and kept frames -> a training folder
  commands.py  `grad-edge serve | dataset`
  templates/, static/   the pages and the one script they use (no CDN)
"""
