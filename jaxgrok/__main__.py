from jaxgrok.cli import main

raise SystemExit(main())
