"""mtjax: HICCAP in JAX/Flax with a multi-task training lab."""

__version__ = "0.1.0"
