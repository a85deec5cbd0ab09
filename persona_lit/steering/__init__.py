"""Persona directions in activation space and what uses them: activation steering (mechanisms/steer.py),
the steer-then-release persistence measurement, the strength sweep, and the llama.cpp export.

Layer convention everywhere here: index L is the output of decoder block L (the residual stream after
it), which is `hidden_states[L + 1]` in transformers' output tuple (for the last block transformers
replaces that entry by the final-norm output; our hooks read the block itself).
"""
