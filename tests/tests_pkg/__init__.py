"""A small user package for the CLI tests: `exactlr lr --model tests_pkg.module:factory`."""
