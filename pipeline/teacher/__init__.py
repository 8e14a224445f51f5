"""The teacher side (gen-logits): engines that run the teacher, its exact top-k and sampled tail."""
