"""The ``segq`` command line: runs the API and the worker, administers
projects and weights, and is a small client of the HTTP API."""
