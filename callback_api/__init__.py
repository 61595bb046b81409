"""The HTTP API: callbacks from external services (Azure-compatible too), the task API and the
operations endpoints and page. It depends on the core (`worker`), never the other way round."""
