from kbms.cli import main

main()
