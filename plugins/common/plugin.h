// What every trtglm TensorRT plugin shares: the IPluginV3 plumbing (capabilities, clone, names), attribute parsing
// and serialization through PluginFieldCollection, dtype mapping and logging through the ILoggerFinder TensorRT
// hands to the library. A plugin derives from PluginBase<Derived> and implements the shape, type, format and
// enqueue methods; its attributes are a plain struct read by `read` and written by `fields`.
#pragma once

#include "common/kernels.h"

#include <NvInferRuntime.h>

#include <cstring>
#include <string>
#include <vector>

namespace trtglm
{

constexpr char const* kNAMESPACE = "trtglm";
constexpr char const* kVERSION = "1";

// Logs through the ILogger TensorRT gave the library (setLoggerFinder); silent before that.
void logError(char const* msg) noexcept;

inline bool toDType(nvinfer1::DataType t, DType& out) noexcept
{
    switch (t)
    {
    case nvinfer1::DataType::kFLOAT: out = DType::kFLOAT; return true;
    case nvinfer1::DataType::kHALF: out = DType::kHALF; return true;
    case nvinfer1::DataType::kBF16: out = DType::kBF16; return true;
    case nvinfer1::DataType::kINT8: out = DType::kINT8; return true;
    default: return false;
    }
}

inline bool isFloat(nvinfer1::DataType t) noexcept
{
    return t == nvinfer1::DataType::kFLOAT || t == nvinfer1::DataType::kHALF || t == nvinfer1::DataType::kBF16;
}

inline int64_t volume(nvinfer1::Dims const& d) noexcept
{
    int64_t v = 1;
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        v *= d.d[i];
    }
    return v;
}

// Reads named scalar attributes from a PluginFieldCollection (ONNX attributes arrive as INT32 / FLOAT32 fields).
class FieldReader
{
public:
    explicit FieldReader(nvinfer1::PluginFieldCollection const* fc) noexcept : mFc(fc) {}

    template <typename T>
    bool get(char const* name, T& value) const noexcept
    {
        nvinfer1::PluginField const* f = find(name);
        if (f == nullptr || f->data == nullptr || f->length < 1)
        {
            return false;
        }
        switch (f->type)
        {
        case nvinfer1::PluginFieldType::kINT32: value = static_cast<T>(*static_cast<int32_t const*>(f->data)); return true;
        case nvinfer1::PluginFieldType::kINT64: value = static_cast<T>(*static_cast<int64_t const*>(f->data)); return true;
        case nvinfer1::PluginFieldType::kFLOAT32: value = static_cast<T>(*static_cast<float const*>(f->data)); return true;
        case nvinfer1::PluginFieldType::kFLOAT64: value = static_cast<T>(*static_cast<double const*>(f->data)); return true;
        default: return false;
        }
    }

private:
    nvinfer1::PluginField const* find(char const* name) const noexcept
    {
        for (int32_t i = 0; mFc != nullptr && i < mFc->nbFields; ++i)
        {
            if (mFc->fields[i].name != nullptr && std::strcmp(mFc->fields[i].name, name) == 0)
            {
                return &mFc->fields[i];
            }
        }
        return nullptr;
    }

    nvinfer1::PluginFieldCollection const* mFc;
};

// Collects fields pointing at the plugin's own members (valid while the plugin lives).
class FieldWriter
{
public:
    void add(char const* name, int32_t const* v) { mFields.emplace_back(name, v, nvinfer1::PluginFieldType::kINT32, 1); }
    void add(char const* name, float const* v) { mFields.emplace_back(name, v, nvinfer1::PluginFieldType::kFLOAT32, 1); }
    nvinfer1::PluginFieldCollection const* collection() noexcept
    {
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
        return &mCollection;
    }
    void clear() noexcept { mFields.clear(); }

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
};

// The IPluginV3 plumbing. Derived provides: static constexpr char const* kNAME; a copy constructor; fields(FieldWriter&).
template <typename Derived>
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime
{
public:
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    nvinfer1::IPluginV3* clone() noexcept override
    {
        try
        {
            return new Derived(*static_cast<Derived const*>(this));
        }
        catch (...)
        {
            logError("trtglm plugin: out of memory in clone");
            return nullptr;
        }
    }

    char const* getPluginName() const noexcept override { return Derived::kNAME; }
    char const* getPluginVersion() const noexcept override { return kVERSION; }
    char const* getPluginNamespace() const noexcept override { return kNAMESPACE; }

    int32_t onShapeChange(nvinfer1::PluginTensorDesc const*, int32_t, nvinfer1::PluginTensorDesc const*,
        int32_t) noexcept override
    {
        return 0;
    }

    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const*, int32_t, nvinfer1::DynamicPluginTensorDesc const*,
        int32_t) noexcept override
    {
        return 0;
    }

    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext*) noexcept override { return clone(); }

    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        mWriter.clear();
        static_cast<Derived*>(this)->fields(mWriter);
        return mWriter.collection();
    }

protected:
    PluginBase() = default;
    PluginBase(PluginBase const&) : mWriter() {}

private:
    FieldWriter mWriter;
};

// A creator for plugin P: P(FieldReader const&, bool& ok) parses and validates the attributes.
template <typename P>
class Creator : public nvinfer1::IPluginCreatorV3One
{
public:
    Creator()
    {
        P::fieldNames(mNames);
        for (char const* name : mNames)
        {
            mFields.emplace_back(name, nullptr, nvinfer1::PluginFieldType::kUNKNOWN, 1);
        }
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
    }

    nvinfer1::IPluginV3* createPlugin(
        char const* /*name*/, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase) noexcept override
    {
        try
        {
            bool ok = true;
            auto* plugin = new P(FieldReader(fc), ok);
            if (!ok)
            {
                delete plugin;
                return nullptr;
            }
            return plugin;
        }
        catch (...)
        {
            logError("trtglm plugin: out of memory in createPlugin");
            return nullptr;
        }
    }

    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }
    char const* getPluginName() const noexcept override { return P::kNAME; }
    char const* getPluginVersion() const noexcept override { return kVERSION; }
    char const* getPluginNamespace() const noexcept override { return kNAMESPACE; }

private:
    std::vector<char const*> mNames;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
};

} // namespace trtglm
