"""`fewstep serve`: the AUTOMATIC1111 web UI's HTTP API (`/sdapi/v1/...`) over a fewstep pipeline, so the
tools that speak it (the `webuiapi` client, Krita's plugin, chat bots, scripts) work unchanged.

`app.create_app` builds the FastAPI app; `a1111` holds the request models and A1111's names; `worker`
runs one generation at a time behind a bounded queue and keeps the progress state; `catalog` lists the
models and LoRAs a client may choose; `cli` is the command. FastAPI, pydantic and uvicorn are optional
(`pip install 'fewstep[serve]'`): nothing else in fewstep imports this package. docs/serving.md is the guide.
"""
