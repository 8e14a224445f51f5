"""The student side (train-student, eval): batches from the cache, the chunked head loss, the losses,
the Trainer subclass and LoRA wrapping."""
