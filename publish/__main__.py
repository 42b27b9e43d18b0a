"""python -m publish: publish.documents's main."""
from publish.documents import main

main()
