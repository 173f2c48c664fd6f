"""Tools around the scoring path: the local model zoo (``zoo``), the classifier training loop
(``trainer``), the demo, model-name parsing and small CLI/table helpers. Nothing in the scoring
path (adapters, taps, detectors) imports this package."""
