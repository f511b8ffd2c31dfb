"""`fewstep bench`: load, encode, step, decode and end-to-end time and memory, each library in fresh
processes, optionally against diffusers in the same run (`harness` runs, `child` measures, `report` prints)."""
