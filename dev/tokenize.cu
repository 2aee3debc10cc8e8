/*
tokenize: text to token ids and back with a tokenizer file, as a filter.

  ./tokenize -k model.tokenizer [-w 1] < text.txt          ids, space-separated, on one line
  ./tokenize -k model.tokenizer -m decode < ids.txt         the text of the ids

Encoding (-m encode, the default) reads all of stdin as one text (bytes, newlines included)
and prints its ids; -w 1 puts the tokenizer's bos id first. Decoding reads ids separated by
whitespace and writes the decoded bytes with no newline added (control tokens such as bos
give no text). Use it to check a tokenizer file against Hugging Face tokenizers, or to
measure its speed: encoding prints its time and MB/s to stderr.
*/
#include "../llm.cu"

int main(int argc, char** argv) {
    const char* tok_path = "";
    int decode = 0, bos = 0;
    std::vector<Flag> flags = {
        {'k', FLAG_PATH, &tok_path, 0, 0, "tokenizer file (required)"},
        {'m', FLAG_CHOICE, &decode, 0, 0, "mode: encode stdin's text to ids, or decode ids to text", "encode|decode"},
        {'w', FLAG_INT, &bos, 0, 1, "1: with the bos id first when encoding"},
    };
    flags_parse(argc, argv, "encode stdin's text to ids, or decode ids to text", flags);
    if (!*tok_path) fail_flag('k', "the tokenizer file is required");
    Tokenizer tok;
    tokenizer_load(&tok, tok_path);

    std::string input;
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) input.append(buf, n);
    if (ferror(stdin)) {
        fprintf(stderr, "error: reading stdin: %s\n", strerror(errno));
        return 1;
    }

    if (decode) {
        std::vector<int> ids;
        const char* p = input.c_str();
        char* end;
        for (;;) {
            while (*p && isspace((unsigned char)*p)) p++;
            if (!*p) break;
            errno = 0;
            long id = strtol(p, &end, 10);
            if (end == p || errno || id < 0 || id >= tok.vocab_size || (*end && !isspace((unsigned char)*end))) {
                size_t len = strcspn(p, " \t\r\n");
                fprintf(stderr, "error: stdin: '%.*s' is not a token id (0..%d)\n", (int)std::min<size_t>(len, 40), p,
                        tok.vocab_size - 1);
                return 1;
            }
            ids.push_back((int)id);
            p = end;
        }
        std::string text = tokenizer_decode(&tok, ids.data(), (int)ids.size());
        fwrite(text.data(), 1, text.size(), stdout);
        return 0;
    }

    std::vector<int> ids;
    if (bos) {
        if (tok.bos_id < 0) fail_flag('w', "the tokenizer has no bos id");
        ids.push_back(tok.bos_id);
    }
    auto start = std::chrono::steady_clock::now();
    tokenizer_encode(&tok, input.data(), input.size(), ids);
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::string line;
    for (size_t i = 0; i < ids.size(); i++) {
        if (i) line += ' ';
        line += std::to_string(ids[i]);
    }
    line += '\n';
    fwrite(line.data(), 1, line.size(), stdout);
    fprintf(stderr, "encoded %zu bytes into %zu tokens in %.3f s: %.2f MB/s\n", input.size(), ids.size(), seconds,
            input.size() / 1e6 / std::max(seconds, 1e-9));
    return 0;
}
