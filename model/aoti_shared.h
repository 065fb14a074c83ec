// Prepended to what every package's C++ wrapper shares (model/cxx.py). AOTInductor's model base constructor parses
// its device name with std::regex (torch/csrc/inductor/aoti_runtime/model_base.h, parse_device_str): compiling
// libstdc++'s regex machinery again for every package took about half of each wrapper's g++ time (2.0–2.5 s of
// 4.4 s on a 2-core Xeon). Here the block's own code declares it instantiated elsewhere (extern template), and the
// runtime interface's object, compiled once per machine, instantiates it (ATTN_REGEX_KIND defined as `template`).
// Where these declarations do not fit the library, the wrapper compiles whole, as inductor writes it.
#include <regex>
#include <string>
#if defined(__GLIBCXX__) && _GLIBCXX_USE_CXX11_ABI
#ifndef ATTN_REGEX_KIND
#define ATTN_REGEX_KIND extern template
#endif
ATTN_REGEX_KIND class std::__cxx11::basic_regex<char>;
ATTN_REGEX_KIND class std::__detail::_Compiler<std::__cxx11::regex_traits<char>>;
ATTN_REGEX_KIND class std::__detail::_Scanner<char>;
ATTN_REGEX_KIND class std::__detail::_NFA<std::__cxx11::regex_traits<char>>;
ATTN_REGEX_KIND bool std::__detail::__regex_algo_impl<std::string::const_iterator, std::allocator<std::ssub_match>, char, std::__cxx11::regex_traits<char>>(
    std::string::const_iterator, std::string::const_iterator, std::smatch&, const std::regex&, std::regex_constants::match_flag_type,
    std::__detail::_RegexExecutorPolicy, bool);
#endif
