"""Feature importance, examples, labels, explanations and dashboards; also the end-to-end demo."""
