"""The executor: everything that turns a scheduled step into device work and back (host numpy in, sampled ids out):
the model runner, its compiled programs, paged attention, cascade planning, on-device sampling, deterministic
steps, tensor parallelism and multi-host following."""
