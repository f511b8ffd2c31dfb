"""Batch runs over prompt files: `fewstep generate --from-file prompts.(txt|jsonl|tsv) --output DIR`.

`rows` reads the file (one prompt per line; JSONL with per-row settings; PartiPrompts' TSV by column,
with filters), `run` generates the rows that are not done yet, in batches of rows with the same
settings, each image written whole (a temporary file, then renamed) and recorded in DIR/manifest.jsonl
with its settings, time and sha256, so a re-run skips what exists and verifies; DIR/index.html shows them.
"""
