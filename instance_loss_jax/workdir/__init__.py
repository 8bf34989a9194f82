"""A run's directory: its checkpoints (`checkpoint`: what is saved, restored and checked against
the run), the faults met there (`faults`: a full disk, a damaged checkpoint, several processes
agreeing on a step) and its one writer (`writer`: the claim and heartbeat that keep a second job
out). The trainer writes a workdir through these; the readers (evaluation, export, the Index)
read it through `checkpoint`."""
