"""The server's default limits, in a module of their own so `fewstep serve --help` can show them without
FastAPI installed."""

MAX_WORK = 2**30  # width x height x images x steps per request: 1024x1024 x 1 x 1024 steps, 512x512 x 8 x 512
MAX_BODY = 32 * 2**20  # bytes: room for a few large base64 source images
MAX_QUEUE = 32  # waiting requests each hold a thread of FastAPI's pool (40), which /progress also needs
OPTIONAL = ("fastapi", "pydantic", "pydantic_core", "starlette", "uvicorn")  # `pip install 'fewstep[serve]'`
