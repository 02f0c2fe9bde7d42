"""`mlprep serve`: the results folder as an HTTP API and a web page (mlprep.serve.app)."""
