"""Process-level leaves every part may use: threads, memory, BLAS settings. Nothing here imports the
rest of the package."""
