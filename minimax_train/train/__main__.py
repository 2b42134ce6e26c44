from minimax_train.train.cli import main

if __name__ == "__main__":
    main()
