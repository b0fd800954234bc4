"""The one way a run goes through the plugin, shared by the toolbox algorithms and the dock.

`spec` says what to run, `inputs` makes layers readable by the backend, `runner` runs the job through
the backend service (`remote` sends a job's files to a remote one and brings its results back), `changes`
marks what the refiner changed, and `outcome` turns the end of a run into layer names and messages.
"""
