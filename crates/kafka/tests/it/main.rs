// tests land in the next commit
