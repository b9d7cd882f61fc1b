"""imageqa workers: the Celery task with a warm vLLM engine, image loading, prompts, QA checks,
the results collector, the one-box runner and the DataFlow-style operator API."""
