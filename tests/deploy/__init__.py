"""Static checks of the deployment files (Dockerfile, compose, Kubernetes, Prometheus, Grafana)."""
