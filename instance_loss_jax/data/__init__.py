"""Dataset readers, vocabulary, tf.data pipelines and the built-in synthetic dataset."""
