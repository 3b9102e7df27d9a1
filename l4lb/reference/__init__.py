"""Plain-Python reference twins of the compiled algorithms in l4lb._native (one module
per algorithm, named by its config word) and of the routing key (routing.py).

Each twin is the executable spec of its Cython class: same constructor, same methods,
same picks for the same sequence of operations and the same seed. The tests drive both
with one random sequence and compare (tests/unit/test_algorithm_parity.py). Never used on the
data path.
"""
