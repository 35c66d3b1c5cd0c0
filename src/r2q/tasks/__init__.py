"""Built-in tasks with gold answers, for tests, demos and the theory report."""
