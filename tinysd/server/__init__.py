# `tinysd serve`: AUTOMATIC1111's HTTP API and a web page over one queue of generation jobs (the `server` extra: fastapi, uvicorn).
