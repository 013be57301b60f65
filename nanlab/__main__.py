from nanlab.cli import main

main()
