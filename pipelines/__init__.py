"""kdcurate batch jobs: the demo and job runners that chain the stages."""
