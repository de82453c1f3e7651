"""``mmcore serve``: HTTP scoring with dynamic batching (FastAPI + uvicorn)."""
