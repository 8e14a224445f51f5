"""Distilling a teacher whose tokenizer differs from the student's, from the offline cache.

alignment: both tokenizations of each assistant turn's text, matched by character offsets (chunks);
vocab:     the tokens both vocabularies share (same decoded text), and end-of-turn tokens by role;
loss:      chunk likelihood (ALM-style), shared-vocabulary KL, ULD, fused with the student's CE;
batches:   cache rows + alignments -> the student's batches.
"""
