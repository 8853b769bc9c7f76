"""`mtl-edge serve`: enroll and predict over HTTP, with a web page, dynamic batching and metrics.

Device side only (no torch), behind the `serve` extra (`pip install 'mtl-edge[cpu,serve]'`).

    config.py    ServeConfig: bundle, gallery, address, token policy, limits, batching
    errors.py    HttpError and the status code of every user error (400, 401/403, 404, 409,
                 413, 503); the messages are the CLI's one-liners
    batching.py  DynamicBatcher: gathers single images of concurrent requests into one backend
                 run (bounded size and wait), on one worker thread
    metrics.py   Prometheus counters and histograms (requests, stages, batch sizes)
    gallery.py   the shared gallery file as the server sees it (cache keyed by the file's
                 identity, so CLI edits show at once) and the thumbnails kept beside it
    service.py   the operations: decode, predict, enroll, rename, remove, threshold
    guard.py     ASGI middleware: token check, request size limit, security headers, metrics
    app.py       the FastAPI application: /v1 JSON API, /metrics, the page at /
    server.py    binding the socket and running uvicorn
    static/      the web page (plain HTML, CSS and JavaScript; nothing from outside the box)

See docs/serve.md for the API, the design decisions and deployment.
"""
