"""`adapterkit serve`: an OpenAI-compatible HTTP server for a base model and many adapters at once.

- `protocol.py`: the request bodies, checked; `ServeError` (status + one line naming the field).
- `registry.py`: the base model and named adapters on one AdaptedModel (load, verify, unload, hashes).
- `decoding.py`: sampling as OpenAI defines it; stop strings and the text a stream may send.
- `scheduler.py`: the thread that owns the model: continuous batching over a KV cache per batch.
- `app.py`: the FastAPI routes; `page.py`: the playground at `/`; `server.py`: uvicorn.

Needs FastAPI and uvicorn (`pip install 'adapterkit[serve]'`); importing this package imports them.
"""
