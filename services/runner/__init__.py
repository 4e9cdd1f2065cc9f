"""The runner: one per node; starts, supervises and stops the `swift` processes of its jobs."""
