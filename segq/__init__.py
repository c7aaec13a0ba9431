"""Code shared by the API and the worker: settings, database, storage, queue contract."""
