"""The training runtime: configuration, building, the trainer and its collaborators."""
