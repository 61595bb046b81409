"""Tests of the deployment files: the container image, compose, Kubernetes."""
