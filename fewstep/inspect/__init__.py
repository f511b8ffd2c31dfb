"""`fewstep inspect`: every layer of a model, its shapes, parameters, FLOPs and memory, measured on the
meta device (no weights). `measure` builds and measures, `report` / `compare` / `svg` render."""
