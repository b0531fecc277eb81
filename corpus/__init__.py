"""Text sources, task suites, packing into sequences, and the activation/teacher cache."""
