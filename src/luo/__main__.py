from luo.cli import main

raise SystemExit(main())
