"""Ready-to-run jobs (networks, sample files, job files, workflow files), installed with the package as
``znn.workflows`` so that every command runs from a wheel; :mod:`znn.io.bundled` finds them."""
