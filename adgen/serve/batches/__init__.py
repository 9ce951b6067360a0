"""The OpenAI Batch API on the live server: uploaded files, batches run at low priority beside live traffic,
crash-safe under a state directory (files.py: the Files API's storage; store.py: batches and their finished rows
on disk; runner.py: running them through the live routes' handlers; routes.py: the HTTP routes)."""

from adgen.serve.batches.files import FileLimits, FileStore
from adgen.serve.batches.routes import add_batch_routes
from adgen.serve.batches.runner import BatchRunner, Handler
from adgen.serve.batches.store import BatchStore

__all__ = ["BatchRunner", "BatchStore", "FileLimits", "FileStore", "Handler", "add_batch_routes"]
