"""Deployment helpers: the Docker Compose generator (`python -m fedsparse.deploy`) and the byte-counting TCP relay."""
