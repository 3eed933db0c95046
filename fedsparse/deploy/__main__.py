"""`python -m fedsparse.deploy compose --nodes N`: see `fedsparse.deploy.compose`."""

from fedsparse.deploy.compose import main

main()
