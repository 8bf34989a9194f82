"""Evaluation: one split's retrieval metrics (`evaluator`), and what it writes: tables, plots,
HTML pages.

Docstring only: `metrics`, `tables`, `plots` and `pages` import no JAX or TensorFlow, and
importing one of them does not bring in `evaluator` (JAX, tf.data).
"""
